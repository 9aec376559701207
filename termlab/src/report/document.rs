//! A tiny document model rendered to Markdown and to self-contained HTML.

/// A report: a title and blocks in order.
#[derive(Debug, Clone)]
pub struct Document {
    title: String,
    blocks: Vec<Block>,
}

#[derive(Debug, Clone)]
pub enum Block {
    Heading(String),
    Paragraph(String),
    /// `highlight[i]` marks row `i` (a failure, a changed value).
    Table {
        header: Vec<String>,
        rows: Vec<Vec<String>>,
        highlight: Vec<bool>,
    },
    /// An SVG plot: linked as `file_name` from Markdown, inlined in HTML.
    Figure {
        file_name: String,
        caption: String,
        svg: String,
    },
}

impl Document {
    pub fn new(title: String) -> Self {
        Document { title, blocks: Vec::new() }
    }

    pub fn push(&mut self, block: Block) {
        self.blocks.push(block);
    }

    /// (file name, SVG text) of every figure, for writing next to report.md.
    pub fn figures(&self) -> impl Iterator<Item = (&str, &str)> {
        self.blocks.iter().filter_map(|block| match block {
            Block::Figure { file_name, svg, .. } => Some((file_name.as_str(), svg.as_str())),
            _ => None,
        })
    }

    pub fn to_markdown(&self) -> String {
        let mut out = format!("# {}\n", self.title);
        for block in &self.blocks {
            out.push('\n');
            match block {
                Block::Heading(text) => out.push_str(&format!("## {text}\n")),
                Block::Paragraph(text) => out.push_str(&format!("{text}\n")),
                Block::Table { header, rows, highlight } => {
                    out.push_str(&markdown_row(header));
                    out.push_str(&markdown_row(&vec!["---".to_owned(); header.len()]));
                    for (row, &marked) in rows.iter().zip(highlight) {
                        let cells: Vec<String> = if marked {
                            row.iter()
                                .map(|c| if c.is_empty() { c.clone() } else { format!("**{c}**") })
                                .collect()
                        } else {
                            row.clone()
                        };
                        out.push_str(&markdown_row(&cells));
                    }
                }
                Block::Figure { file_name, caption, .. } => {
                    out.push_str(&format!("![{caption}]({file_name})\n"))
                }
            }
        }
        out
    }

    pub fn to_html(&self) -> String {
        let mut out = format!(
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{}</h1>\n",
            escape(&self.title),
            escape(&self.title)
        );
        for block in &self.blocks {
            match block {
                Block::Heading(text) => out.push_str(&format!("<h2>{}</h2>\n", escape(text))),
                Block::Paragraph(text) => out.push_str(&format!("<p>{}</p>\n", escape(text))),
                Block::Table { header, rows, highlight } => {
                    out.push_str("<table>\n<tr>");
                    for cell in header {
                        out.push_str(&format!("<th>{}</th>", escape(cell)));
                    }
                    out.push_str("</tr>\n");
                    for (row, &marked) in rows.iter().zip(highlight) {
                        out.push_str(if marked { "<tr class=\"marked\">" } else { "<tr>" });
                        for cell in row {
                            out.push_str(&format!("<td>{}</td>", escape(cell)));
                        }
                        out.push_str("</tr>\n");
                    }
                    out.push_str("</table>\n");
                }
                Block::Figure { caption, svg, .. } => {
                    // plotters' SVG is a complete <svg> element, safe to inline.
                    out.push_str(&format!(
                        "<figure>\n{svg}\n<figcaption>{}</figcaption>\n</figure>\n",
                        escape(caption)
                    ));
                }
            }
        }
        out.push_str("</body>\n</html>\n");
        out
    }
}

const STYLE: &str = "body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}\
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:.3em .6em;text-align:left}\
th{background:#eee}tr.marked td{background:#fdd;font-weight:bold}figure{display:inline-block;margin:.5em}";

fn markdown_row(cells: &[String]) -> String {
    let escaped: Vec<String> =
        cells.iter().map(|c| c.replace('|', "\\|").replace('\n', " ")).collect();
    format!("| {} |\n", escaped.join(" | "))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Document {
        let mut doc = Document::new("run <x> & y".into());
        doc.push(Block::Heading("Expectations".into()));
        doc.push(Block::Table {
            header: vec!["".into(), "name".into()],
            rows: vec![vec!["pass".into(), "a|b".into()], vec!["FAIL".into(), "c".into()]],
            highlight: vec![false, true],
        });
        doc.push(Block::Figure {
            file_name: "m-cdf.svg".into(),
            caption: "m".into(),
            svg: "<svg id=\"plot\"></svg>".into(),
        });
        doc
    }

    #[test]
    fn markdown_escapes_pipes_bolds_marked_rows_and_links_figures() {
        let md = sample().to_markdown();
        assert!(md.starts_with("# run <x> & y\n"));
        assert!(md.contains("| pass | a\\|b |\n"));
        assert!(md.contains("| **FAIL** | **c** |\n"));
        assert!(md.contains("![m](m-cdf.svg)"));
    }

    #[test]
    fn html_escapes_text_marks_rows_and_inlines_svg() {
        let html = sample().to_html();
        assert!(html.contains("<h1>run &lt;x&gt; &amp; y</h1>"));
        assert!(html.contains("<tr class=\"marked\"><td>FAIL</td>"));
        assert!(html.contains("<svg id=\"plot\"></svg>"));
        // Self-contained: nothing is loaded from elsewhere.
        assert!(!html.contains("src=") && !html.contains("href="));
    }
}
